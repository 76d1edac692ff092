"""coexit training: data preparation (`coexit prepare-data`) and DeepSpeed early-exit training (`coexit train`):
pipeline x tensor x data parallel with exit losses, EE-tuning, checkpoint/resume, export to a coexit checkpoint.
Imports coexit and deepspeed, never grpc."""
