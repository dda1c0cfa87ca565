"""VIMS: attest a running virtual machine by its behaviour.

The parts of the package are the repository's top-level folders:

- :mod:`vims.collector` -- the A-VM's view into the guest (memory, events, static checks),
- :mod:`vims.models` -- sequence features and anomaly detectors,
- :mod:`vims.training` -- fitting, calibrating and evaluating models,
- :mod:`vims.remote` -- REM-S, the remote attestation server,
- :mod:`vims.datasets` -- importers of public traces and of our own captures.

The core (this folder) holds what they all share: the Arrow schemas (:mod:`vims.schemas`),
table I/O (:mod:`vims.tables`), user-facing errors (:mod:`vims.errors`), paths
(:mod:`vims.paths`), terminal output (:mod:`vims.console`) and the ``vims`` command (:mod:`vims.cli`).
"""

__version__ = "0.1.0"
