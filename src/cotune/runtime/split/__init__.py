"""Split methods at run time: `launch.run_split` (in process, loopback processes, or
one device of a remote cloud) and `serve` (the cloud as a gRPC service, `cotune cloud`)."""
