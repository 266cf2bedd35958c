#!/usr/bin/env bash
# CPU flags for building llama.cpp: the host's SIMD levels, never AMX (its tile kernels crash in VMs
# that advertise AMX without granting tile state).
f=$(grep -m1 '^flags' /proc/cpuinfo)
has() { case " $f " in *" $1 "*) return 0;; esac; return 1; }
a="-DGGML_NATIVE=OFF -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF"
has avx && a="$a -DGGML_AVX=ON"
has avx2 && a="$a -DGGML_AVX2=ON"
has fma && a="$a -DGGML_FMA=ON"
has f16c && a="$a -DGGML_F16C=ON"
has bmi2 && a="$a -DGGML_BMI2=ON"
has avx_vnni && a="$a -DGGML_AVX_VNNI=ON"
has avx512f && a="$a -DGGML_AVX512=ON"
has avx512vbmi && a="$a -DGGML_AVX512_VBMI=ON"
has avx512_vnni && a="$a -DGGML_AVX512_VNNI=ON"
has avx512_bf16 && a="$a -DGGML_AVX512_BF16=ON"
echo "$a"
