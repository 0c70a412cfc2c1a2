// Runs ggml's reference k-quant quantizers (quantize_row_q{4,5,6}_K_ref in ggml-quants.c) on
// little-endian f32 read from stdin and writes the quantized blocks to stdout. gguf-py has no
// k-quant quantizers, so tools/dequant_reference.py builds this against llama.cpp's ggml sources
// to make the k-quant quantization reference vectors:
//
//   gcc -O2 -std=gnu11 -DNDEBUG -I$GGML/include -I$GGML/src tools/ggml_kquant_oracle.c \
//       $GGML/src/ggml-quants.c -lm -o ggml_kquant_oracle
//
// Built for baseline x86-64 (no FMA instructions, so no multiply-add contraction), the C code
// rounds every float operation separately, as Rust does.
//
// Usage: ggml_kquant_oracle q4_k|q5_k|q6_k N_ELEMENTS < input.f32 > output.bin

#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

void quantize_row_q4_K_ref(const float * x, void * y, int64_t k);
void quantize_row_q5_K_ref(const float * x, void * y, int64_t k);
void quantize_row_q6_K_ref(const float * x, void * y, int64_t k);

// ggml-quants.c refers to these ggml.c functions on paths the k-quant reference never takes.
void ggml_abort(const char * file, int line, const char * fmt, ...) {
    (void) fmt;
    fprintf(stderr, "ggml_abort at %s:%d\n", file, line);
    abort();
}
size_t ggml_row_size(int type, int64_t n) { (void) type; (void) n; abort(); }
const char * ggml_type_name(int type) { (void) type; abort(); }
size_t ggml_type_size(int type) { (void) type; abort(); }

int main(int argc, char ** argv) {
    if (argc != 3) {
        fprintf(stderr, "usage: %s q4_k|q5_k|q6_k N_ELEMENTS < f32 > blocks\n", argv[0]);
        return 2;
    }
    const char * ty = argv[1];
    long n = atol(argv[2]);
    size_t block;
    void (*quantize)(const float *, void *, int64_t);
    if (!strcmp(ty, "q4_k")) {
        block = 144;
        quantize = quantize_row_q4_K_ref;
    } else if (!strcmp(ty, "q5_k")) {
        block = 176;
        quantize = quantize_row_q5_K_ref;
    } else if (!strcmp(ty, "q6_k")) {
        block = 210;
        quantize = quantize_row_q6_K_ref;
    } else {
        fprintf(stderr, "unknown type %s\n", ty);
        return 2;
    }
    if (n <= 0 || n % 256 != 0) {
        fprintf(stderr, "N_ELEMENTS must be a positive multiple of 256\n");
        return 2;
    }
    float * x = malloc((size_t) n * sizeof(float));
    uint8_t * y = calloc((size_t) n / 256, block);
    if (!x || !y || fread(x, sizeof(float), (size_t) n, stdin) != (size_t) n) {
        fprintf(stderr, "cannot read %ld floats\n", n);
        return 1;
    }
    quantize(x, y, n);
    fwrite(y, block, (size_t) n / 256, stdout);
    return 0;
}
