"""llama.cpp's shared libraries through llama-cpp-python's ctypes API: `lib` (loading, logging, the hidden-state
capture, the extra-buffer-types probe) and `native/` (the small C eval callback it compiles). Knows nothing about
coexit models. May import nothing else of edge."""
