// adakv-impl.h - helpers shared by the native sources of adakv-local (not part of the C API)

#pragma once

#include <cstdint>

// records the message returned by llama_adakv_last_error() on this thread; returns code
int32_t llama_adakv_set_error(int32_t code, const char * fmt, ...)
#ifdef __GNUC__
        __attribute__((format(printf, 2, 3)))
#endif
        ;

// clears the last error of this thread
void llama_adakv_clear_error();

// testing (llama_adakv_test_fail_alloc): true when this allocation point must fail as if memory
// ran out; every allocation point of native code asks it before allocating
bool llama_adakv_alloc_fails();
