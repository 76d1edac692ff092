"""Writing the edge stage for llama.cpp: `gguf` (one GGUF, quantized by llama.cpp's own quantizer, mixes),
`segments` (one GGUF per exit interval), `vocab` (the tokenizer as GGUF vocabulary), `imatrix` (an importance
matrix from coexit's torch model; `coexit imatrix`), `lora` (LoRA adapters as GGUF adapters that llama.cpp applies
at run time), `cli` (the `coexit export-edge` command over gguf, segments and lora). May import edge.llamacpp."""
