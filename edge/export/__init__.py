"""Writing the edge stage for llama.cpp: `gguf` (one GGUF, quantized by llama.cpp's own quantizer, mixes),
`segments` (one GGUF per exit interval), `vocab` (the tokenizer as GGUF vocabulary), `imatrix` (an importance
matrix from coexit's torch model; `coexit imatrix`), `lora` (LoRA adapters as GGUF adapters that llama.cpp applies
at run time), `cli` (the `coexit export-edge` command over gguf, segments and lora), `quant_types` (llama.cpp's
types as stored, their sizes, one tensor rounded by ggml's own quantizer), `sensitivity` (each edge tensor's measured
damage per type), `policy` (one type per tensor under a bits budget: exact knapsack, JSON, GGUF metadata),
`rounding` (learned rounding on llama.cpp's grid, an export step), `qat` (quantization-aware fine-tuning with
llama.cpp-exact fake quantization, an export step; `coexit compress` is edge/apps/compress.py).
May import edge.llamacpp."""
