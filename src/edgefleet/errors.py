"""The one exception tree of edgefleet, and the exit codes of the CLI.

Every error a user can cause or meet derives from :class:`EdgefleetError`. The CLI prints ``str(err)`` as one
line (with ``--json``: ``{"error": "...", "code": N}`` on stdout) and exits with ``err.exit_code``; the control
plane maps each family to an HTTP status in one table (``edgefleet.controlplane.errors``). Messages say what was
wrong and what to do about it.

Exit codes (``docs/cli.md`` holds the same table)::

    0   ok
    1   a verdict of "fail" (``edgefleet gate``) or a check that failed (golden vectors that do not reproduce)
    2   usage error: a bad argument or option, a missing or malformed file, a refused input
    3   not found or conflict: the named device, rollout, model or token does not exist, or the state forbids it
    4   the server is unreachable, or it refused the credential (missing, invalid, revoked, not allowed)
    70  internal error: an unexpected exception (a bug: one line "internal error: ..., please report")
    130 interrupted (Ctrl-C)

::

    EdgefleetError
    ├── UsageError                      bad argument, missing file, unknown name (exit 2)
    │   ├── ConfigError                 settings / policy / tier files that break their schema
    │   └── DataError                   .npz data that does not fit the model
    ├── ModelError                      a model that cannot be loaded or run (exit 2)
    │   ├── InputValidationError        an input of the wrong name, dtype or shape
    │   └── RuntimeUnavailable          the runtime the model needs (litert, openvino) is not installed here
    ├── PackageError                    a .efpkg that is corrupt, breaks the schema or cannot be decrypted (exit 2)
    │   ├── ManifestError
    │   ├── DecryptionError
    │   └── GoldenMismatchError         the model does not reproduce its golden vectors (exit 1: a failed check)
    ├── RepositoryError                 TUF repository: keys, metadata, publish (exit 2)
    │   ├── VerificationError           signature, threshold, hash, length, rollback, freeze
    │   └── DownloadError               network / file fetch failed
    ├── OptimizeError                   (exit 2)
    ├── BenchError                      (exit 2)
    │   └── MemoryBudgetExceeded
    ├── GateError                       the gate could not run (exit 2; a failed gate is a verdict, not an error)
    ├── RegistryError                   control plane domain errors (exit 2)
    │   ├── NotFoundError               (exit 3)
    │   ├── ConflictError               (exit 3)
    │   ├── AuthError                   missing / invalid / revoked credential (exit 4)
    │   ├── ForbiddenError              valid credential, not allowed (exit 4)
    │   ├── ServerUnreachable           no answer from the control plane: refused, timed out, TLS refused (exit 4)
    │   ├── ServerError                 the control plane answered 5xx (exit 70: its bug, not the user's)
    │   ├── InvalidReportError          a device report the wire format refuses (nothing of it is stored)
    │   └── TooLargeError               a request body over its size cap
    ├── RolloutError                    a rollout that conflicts with the fleet's state (exit 3, HTTP 409)
    │   └── IncompatibleError           the package does not support a device's tier or runtime
    └── AgentError                      (exit 1)
        ├── UpdateError                 an update that was refused or failed (reason reported)
        ├── WorkerUnavailable           no inference worker is serving
        └── RemoteUnavailable           hybrid routing's remote OIP endpoint did not answer (unreachable, timeout)
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, Protocol

EXIT_OK = 0
EXIT_CHECK_FAILED = 1
EXIT_USAGE = 2
EXIT_NOT_FOUND = 3
EXIT_UNREACHABLE = 4
EXIT_INTERNAL = 70
EXIT_INTERRUPTED = 130


class EdgefleetError(Exception):
    """Root of every edgefleet error. ``exit_code`` is what the CLI exits with."""

    exit_code = EXIT_CHECK_FAILED

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message


class UsageError(EdgefleetError):
    exit_code = EXIT_USAGE


class ConfigError(UsageError):
    pass


class DataError(UsageError):
    pass


class ModelError(EdgefleetError):
    exit_code = EXIT_USAGE


class InputValidationError(ModelError):
    pass


class RuntimeUnavailable(ModelError):
    pass


class PackageError(EdgefleetError):
    exit_code = EXIT_USAGE


class ManifestError(PackageError):
    pass


class DecryptionError(PackageError):
    pass


class GoldenMismatchError(PackageError):
    exit_code = EXIT_CHECK_FAILED


class RepositoryError(EdgefleetError):
    exit_code = EXIT_USAGE


class VerificationError(RepositoryError):
    pass


class DownloadError(RepositoryError):
    pass


class OptimizeError(EdgefleetError):
    exit_code = EXIT_USAGE


class BenchError(EdgefleetError):
    exit_code = EXIT_USAGE


class MemoryBudgetExceeded(BenchError):
    pass


class GateError(EdgefleetError):
    exit_code = EXIT_USAGE


class RegistryError(EdgefleetError):
    exit_code = EXIT_USAGE


class NotFoundError(RegistryError):
    exit_code = EXIT_NOT_FOUND


class ConflictError(RegistryError):
    exit_code = EXIT_NOT_FOUND


class AuthError(RegistryError):
    exit_code = EXIT_UNREACHABLE


class ForbiddenError(RegistryError):
    exit_code = EXIT_UNREACHABLE


class ServerUnreachable(RegistryError):
    """No answer from the control plane: connection refused, timed out, name not found, TLS certificate refused."""

    exit_code = EXIT_UNREACHABLE


class ServerError(RegistryError):
    """The control plane answered 5xx: its failure, not the user's."""

    exit_code = EXIT_INTERNAL


class InvalidReportError(RegistryError):
    pass


class TooLargeError(RegistryError):
    pass


class RolloutError(EdgefleetError):
    # the control plane answers these with 409, like a ConflictError: the same exit code for the same answer
    exit_code = EXIT_NOT_FOUND


class IncompatibleError(RolloutError):
    pass


class AgentError(EdgefleetError):
    pass


class UpdateError(AgentError):
    pass


class WorkerUnavailable(AgentError):
    pass


class RemoteUnavailable(AgentError):
    """The remote OIP endpoint of hybrid routing gave no usable answer. ``reason``: a bounded label for the
    ``edgefleet_agent_remote_unsent_requests_total`` counter (timeout, unreachable, refused)."""

    def __init__(self, message: str, reason: str = "unreachable") -> None:
        super().__init__(message)
        self.reason = reason


class _HasErrors(Protocol):
    def errors(self) -> Iterable[Mapping[str, Any]]: ...


def validation_summary(err: _HasErrors) -> str:
    """Every error of a pydantic ``ValidationError`` as ``field.path: message``, joined with ``; `` (one line).

    Not ``str(err)``: its first line is only "1 validation error for Model", and the rest spans lines."""
    parts = []
    for e in err.errors():
        where = ".".join(str(p) for p in e.get("loc", ())) or "(root)"
        msg = str(e.get("msg", "invalid")).removeprefix("Value error, ")  # pydantic's prefix for a validator's text
        parts.append(f"{where}: {' '.join(msg.split())}")
    return "; ".join(parts) or "invalid"


def yaml_error_message(source: str, err: Exception) -> str:
    """``source:LINE:COLUMN: problem`` for a PyYAML error (1-based, as editors count), else ``source: error``."""
    mark = getattr(err, "problem_mark", None) or getattr(err, "context_mark", None)
    problem = getattr(err, "problem", None) or getattr(err, "context", None) or str(err)
    text = " ".join(str(problem).split())
    if mark is None:
        return f"{source}: {text}"
    return f"{source}:{mark.line + 1}:{mark.column + 1}: {text}"
