"""Writing the edge stage for llama.cpp: `gguf` (one GGUF, quantized by llama.cpp's own quantizer, mixes; `coexit
export-edge`), `segments` (one GGUF per exit interval), `vocab` (the tokenizer as GGUF vocabulary), `imatrix` (an
importance matrix from coexit's torch model; `coexit imatrix`), `cli` (the `coexit export-edge` command over gguf
and segments). May import edge.llamacpp."""
