"""Framework integrations: each module only builds :class:`~mgup_dist.layout.Layout`s
from a framework's sharded buffers and registers names.  None of them is imported by
``import mgup_dist``: they load on use, so the core needs no framework installed."""
