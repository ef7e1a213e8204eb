"""The one exception tree of edgefleet.

Every error a user can cause or meet derives from :class:`EdgefleetError`. The CLI prints ``str(err)`` as one
line and exits with ``err.exit_code``; the control plane maps each family to an HTTP status in one table
(``edgefleet.controlplane.errors``). Messages say what was wrong and what to do about it.

::

    EdgefleetError
    ├── UsageError                      bad argument, missing file, unknown name (exit 2)
    │   ├── ConfigError                 settings / policy / tier files that break their schema
    │   └── DataError                   .npz data that does not fit the model
    ├── ModelError                      a model that cannot be loaded or run
    │   └── InputValidationError        an input of the wrong name, dtype or shape
    ├── PackageError                    a .efpkg that is corrupt, breaks the schema or cannot be decrypted
    │   ├── ManifestError
    │   ├── DecryptionError
    │   └── GoldenMismatchError         the model does not reproduce its golden vectors
    ├── RepositoryError                 TUF repository: keys, metadata, publish
    │   ├── VerificationError           signature, threshold, hash, length, rollback, freeze
    │   └── DownloadError               network / file fetch failed
    ├── OptimizeError
    ├── BenchError
    │   └── MemoryBudgetExceeded
    ├── GateError                       the gate could not run (a failed gate is a verdict, not an error)
    ├── RegistryError                   control plane domain errors
    │   ├── NotFoundError
    │   ├── ConflictError
    │   ├── AuthError                   missing / invalid / revoked credential
    │   ├── ForbiddenError              valid credential, not allowed
    │   ├── InvalidReportError          a device report the wire format refuses (nothing of it is stored)
    │   └── TooLargeError               a request body over its size cap
    ├── RolloutError
    │   └── IncompatibleError           the package does not support a device's tier or runtime
    └── AgentError
        ├── UpdateError                 an update that was refused or failed (reason reported)
        └── WorkerUnavailable           no inference worker is serving
"""

from __future__ import annotations


class EdgefleetError(Exception):
    """Root of every edgefleet error. ``exit_code`` is what the CLI exits with."""

    exit_code = 1

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message


class UsageError(EdgefleetError):
    exit_code = 2


class ConfigError(UsageError):
    pass


class DataError(UsageError):
    pass


class ModelError(EdgefleetError):
    exit_code = 2


class InputValidationError(ModelError):
    pass


class PackageError(EdgefleetError):
    exit_code = 2


class ManifestError(PackageError):
    pass


class DecryptionError(PackageError):
    pass


class GoldenMismatchError(PackageError):
    pass


class RepositoryError(EdgefleetError):
    exit_code = 2


class VerificationError(RepositoryError):
    pass


class DownloadError(RepositoryError):
    pass


class OptimizeError(EdgefleetError):
    exit_code = 2


class BenchError(EdgefleetError):
    exit_code = 2


class MemoryBudgetExceeded(BenchError):
    pass


class GateError(EdgefleetError):
    exit_code = 2


class RegistryError(EdgefleetError):
    exit_code = 2


class NotFoundError(RegistryError):
    pass


class ConflictError(RegistryError):
    pass


class AuthError(RegistryError):
    pass


class ForbiddenError(RegistryError):
    pass


class InvalidReportError(RegistryError):
    pass


class TooLargeError(RegistryError):
    pass


class RolloutError(EdgefleetError):
    exit_code = 2


class IncompatibleError(RolloutError):
    pass


class AgentError(EdgefleetError):
    pass


class UpdateError(AgentError):
    pass


class WorkerUnavailable(AgentError):
    pass
