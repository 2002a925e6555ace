"""The runtime: executes a method's spec (in this process, over gRPC with child
processes, or on Flower), owns processes, sockets, resume and the run folder."""
