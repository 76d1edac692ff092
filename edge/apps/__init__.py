"""What a person runs on the edge: `generate` (`coexit generate`), `openai_server` (`coexit edge-serve`), `demo`
(`coexit demo`), `adapt` (`coexit adapt`: on-device LoRA tuning of the edge layers), `compress` (`coexit compress`: a
compression policy per edge tensor under a bits budget, for GGUF or bitsandbytes) and `wan_emulator` (the
emulated wide-area link the demo, the benchmarks and the tests use). May import every other room of edge; nothing
imports it."""
