"""BPF C sources, shipped inside the natrace package as tracer.bpfsrc."""
