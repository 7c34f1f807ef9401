"""Every exception imageopt raises, in one place.

Errors from the libraries underneath (psycopg, httpx, Pillow) are translated
into these once, where imageopt meets them, so callers handle one vocabulary::

    ImageoptError
    ├── ConfigurationError          the machine or the settings cannot work as given
    ├── DatabaseUnavailableError    PostgreSQL stayed unreachable past the outage budget
    ├── InvalidRequestError         a user asked for something that cannot be done
    │   └── NotFoundError           an unknown store, job or item
    ├── SchemaError                 the database schema does not fit this code
    │   ├── SchemaTooOldError       below the oldest version this code can run on
    │   ├── MigrationError          a migration could not be applied
    │   │   └── MigrationChecksumError   an applied file was changed afterwards
    │   └── IllegalTransitionError  an item status change that is not allowed
    ├── ImageError                  an image cannot be optimized (empty, broken, a bomb)
    ├── AdmissionError              admission could not let an item or a poll go
    │   ├── AdmissionTimeoutError   no grant within the time the caller allowed
    │   └── AdmissionClosedError    admission was closed while it waited
    └── ProviderError               the prediction API did not do what was asked
        ├── ThrottledError          429: wait ``retry_after`` seconds
        ├── ProviderUnavailableError    5xx, refused connection, timeout
        ├── CreateOutcomeUnknownError   a create was sent and no answer came back
        ├── RejectedError           4xx: the provider refused the request
        ├── PredictionNotFoundError     404 for a prediction id
        └── PredictionPendingError  polled too early: not a failure, poll again
"""

from __future__ import annotations


class ImageoptError(Exception):
    """Base of every error imageopt raises on purpose."""


class ConfigurationError(ImageoptError):
    """The settings or the machine do not allow what was asked."""


class DatabaseUnavailableError(ImageoptError):
    """PostgreSQL could not be reached for longer than work waits for it.

    Short outages (a restart, a dropped connection) are ridden out where the
    work is safe to repeat; this says the outage lasted longer than that.
    """


class InvalidRequestError(ImageoptError, ValueError):
    """A request that cannot be carried out as given; the message says why."""


class NotFoundError(InvalidRequestError, LookupError):
    """A store, job or item that does not exist."""


class SchemaError(ImageoptError):
    """The database schema and this code disagree."""


class SchemaTooOldError(SchemaError):
    """The database is older than the oldest version this code supports."""

    def __init__(self, current: int, needed: int) -> None:
        self.current = current
        self.needed = needed
        super().__init__(
            f"the database schema is at version {current}, this imageopt needs at "
            f"least version {needed}: run `imageopt migrate`"
        )


class MigrationError(SchemaError):
    """A migration file could not be applied."""


class MigrationChecksumError(MigrationError):
    """A migration that was already applied has been edited since.

    Applied migrations are history: changing one would leave databases built
    before and after the edit with different schemas under the same version.
    """


class IllegalTransitionError(SchemaError):
    """An item status change that the status rules do not allow."""


class ImageError(ImageoptError):
    """An input that cannot be optimized; the message says what to do."""


class ProviderError(ImageoptError):
    """The prediction API failed to do what was asked."""


class ThrottledError(ProviderError):
    """The provider answered 429 and asked to wait ``retry_after`` seconds."""

    def __init__(self, message: str, retry_after: float) -> None:
        self.retry_after = retry_after
        super().__init__(message)


class ProviderUnavailableError(ProviderError):
    """A 5xx answer, a refused connection or a timeout: worth trying later."""


class CreateOutcomeUnknownError(ProviderError):
    """A create request was sent but no answer came back.

    The prediction may or may not exist, and there is no idempotency key, so
    sending the create again could pay twice: reconcile instead.
    """


class RejectedError(ProviderError):
    """The provider refused the request (a 4xx other than 404 and 429)."""

    def __init__(self, message: str, status_code: int) -> None:
        self.status_code = status_code
        super().__init__(message)


class PredictionNotFoundError(ProviderError, LookupError):
    """The provider knows no prediction with that id."""


class PredictionPendingError(ProviderError):
    """A prediction was polled and has not finished yet.

    Not a failure: the poll task raises it so that Prefect retries the poll
    after a delay, which makes every wait visible in the item's task history.
    """

    def __init__(self, item_id: int, prediction_id: str, status: str) -> None:
        self.item_id = item_id
        self.prediction_id = prediction_id
        self.status = status
        super().__init__(
            f"item {item_id}: prediction {prediction_id} is still {status}"
        )


class AdmissionError(ImageoptError):
    """Admission could not let an item create its prediction, or a poll go out."""


class AdmissionTimeoutError(AdmissionError, TimeoutError):
    """No grant came within the time the caller was willing to wait.

    Nothing is wrong with the item: the rate or the slots are taken by other
    work. The message names the store and the limits involved.
    """


class AdmissionClosedError(AdmissionError):
    """Admission was closed while a thread waited for a grant."""
