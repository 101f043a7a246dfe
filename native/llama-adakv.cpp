// llama-adakv.cpp - version information and error reporting of the adakv-local C API

#include "llama-adakv.h"

#include "adakv-impl.h"

#include <cstdarg>
#include <cstdio>
#include <string>

#ifndef LLAMA_ADAKV_VERSION
#error "LLAMA_ADAKV_VERSION must be defined by the build"
#endif
#ifndef LLAMA_ADAKV_LLAMA_CPP_COMMIT
#define LLAMA_ADAKV_LLAMA_CPP_COMMIT "unknown"
#endif

static thread_local std::string g_last_error;

int32_t llama_adakv_set_error(int32_t code, const char * fmt, ...) {
    char buf[1024];
    va_list args;
    va_start(args, fmt);
    vsnprintf(buf, sizeof(buf), fmt, args);
    va_end(args);
    g_last_error = buf;
    return code;
}

void llama_adakv_clear_error() {
    g_last_error.clear();
}

const char * llama_adakv_version(void) {
    return LLAMA_ADAKV_VERSION;
}

int32_t llama_adakv_abi_version(void) {
    return LLAMA_ADAKV_ABI_VERSION;
}

const char * llama_adakv_llama_cpp_commit(void) {
    return LLAMA_ADAKV_LLAMA_CPP_COMMIT;
}

void llama_adakv_clear_last_error(void) {
    llama_adakv_clear_error();
}

const char * llama_adakv_last_error(void) {
    return g_last_error.c_str();
}
