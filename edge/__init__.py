"""The edge: the SDK that runs an early-exit model's shallow layers on a device and falls back to the cloud.

Rooms, lowest first. A room imports only the rooms listed after "may import" (and itself, and coexit/); nothing
imports upward, and no two files import each other (tests/edge/test_layout.py checks both from the modules' own
import statements):

- `edge.llamacpp`: llama.cpp's shared libraries through llama-cpp-python (the C capture, the CPU-features probe).
  May import nothing of edge.
- `edge.policy`: exit decisions and their calibration (the learned gate, Learn-then-Test, the adaptive policy,
  `coexit calibrate`). May import nothing of edge.
- `edge.export`: writing the edge as GGUF (whole, segments), its vocabulary, the importance matrix. May import
  edge.llamacpp.
- `edge.backends`: runtimes of the shallow layers behind one contract (torch, bitsandbytes, llama.cpp). May import
  edge.llamacpp and edge.export (a checkpoint directory is exported on first use).
- the SDK, in edge/ itself: `client` (EdgeClient), `run` (one generation: position, split-row history, the cloud
  session), `lossless` (lossless and speculative modes, a run of the same machinery), `link` (the gRPC link). May
  import edge.backends and edge.policy.
- `edge.apps`: what a person runs (`coexit generate`, `coexit edge-serve`, `coexit demo`) and the WAN emulator.
  May import everything below; nothing imports it.
"""
