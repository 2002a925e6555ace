"""Machinery the federated methods share, without Flower: who holds which data
(`data`), moving trainable state (`state`), a client's round (`client`), the server's
global model and its evaluation (`global_model`), averaging and update checks
(`aggregation`). Each federated method declares its `FederatedSpec` in its own module;
the runtime runs it on Flower."""
