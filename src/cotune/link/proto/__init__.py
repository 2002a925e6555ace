"""The link's wire protocol: `cotune_link.proto` and its generated `cotune_link_pb2`."""

from cotune.link.proto import cotune_link_pb2 as pb

__all__ = ["pb"]
