"""`espmed serve`: a scanner-side DICOM node that receives images, segments them and sends a SEG.

A modality or PACS pushes a series by C-STORE; every instance is checked like a `predict` input
and written atomically to the spool before success is returned. A series is complete when no new
instance has come for `series_timeout` seconds; it is then routed (`routing`: the config file's
`[[route]]` tables, by Modality, BodyPartExamined, SeriesDescription and calling AE title) to its
model and segmented by `espmed.pipeline` (as `predict` segments a series: volume by volume, a chunk
of slices at a time), and its DICOM SEG (or Secondary Capture overlays where a SEG cannot describe
the source) is queued for the route's destinations and sent by C-STORE or STOW-RS, with retries and
backoff, into a dead-letter folder after the last try, never dropped. Output UIDs are derived from
the source instances and the model, so a resend is the same instance; a late instance reopens its
series and a superseding SEG (same SEG series, higher InstanceNumber) follows. Whatever is in the
spool when the node starts is resumed.

    config.py     ServeConfig (the [serve] keys and the CLI flags), the config file, --check
    routing.py    [[route]] tables: which model segments a series, where its results go
    spool.py      on-disk state: instances, done records, outbox, dead letters, limits
    scheduler.py  series completion by timeout, the segmentation worker (`pipeline.segment_series`)
    sender.py     per-destination C-STORE or STOW-RS with retry, backoff and dead letters
    server.py     the association acceptor: allowlist, TLS, C-ECHO / C-STORE handlers
    status.py     counters, last errors, the status file
    node.py       wiring, run until stopped
"""

from .config import NodeConfig, ServeConfig, load
from .node import Destination, run

__all__ = ["Destination", "NodeConfig", "ServeConfig", "load", "run"]
