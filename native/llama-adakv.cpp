// llama-adakv.cpp - version information and error reporting of the adakv-local C API

#include "llama-adakv.h"
#include "llama-adakv-testing.h"

#include "adakv-impl.h"

#include <atomic>
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

// llama_adakv_test_fail_alloc: allocation points to pass before one fails (0: none fails)
static std::atomic<int32_t> g_fail_alloc{ 0 };

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

bool llama_adakv_alloc_fails() {
    int32_t n = g_fail_alloc.load();
    while (n > 0 && !g_fail_alloc.compare_exchange_weak(n, n - 1)) {
    }
    return n == 1;
}

void llama_adakv_test_fail_alloc(int32_t n) {
    g_fail_alloc.store(n > 0 ? n : 0);
}
