"""Python client of the LaFTer adaptation service::

from lafter_client import Client

client = Client()  # LAFTER_BASE_URL, LAFTER_API_KEY
ds = client.datasets.create("pets")
client.datasets.upload(ds.id, "./photos")
job = client.jobs.create(ds.id, ["cat", "dog"])
job = client.jobs.wait(job.id, on_event=print)
print(client.models.classify(job.model_id, ["x.jpg"]).data[0].top)
"""

from lafter_client.client import Client
from lafter_client.errors import (
    AuthenticationError,
    BadRequestError,
    ConflictError,
    ConnectionError,
    LafterError,
    NotFoundError,
    PayloadTooLargeError,
    PermissionDeniedError,
    RateLimitError,
    ServerError,
    ServiceUnavailableError,
    StreamError,
    TimeoutError,
    ValidationError,
)
from lafter_client.types import (
    Classification,
    Dataset,
    ImagePredictions,
    Job,
    JobEvent,
    Model,
    Prediction,
    UploadReport,
)

__version__ = "0.1.0"

__all__ = [
    "AuthenticationError",
    "BadRequestError",
    "Classification",
    "Client",
    "ConflictError",
    "ConnectionError",
    "Dataset",
    "ImagePredictions",
    "Job",
    "JobEvent",
    "LafterError",
    "Model",
    "NotFoundError",
    "PayloadTooLargeError",
    "PermissionDeniedError",
    "Prediction",
    "RateLimitError",
    "ServerError",
    "ServiceUnavailableError",
    "StreamError",
    "TimeoutError",
    "UploadReport",
    "ValidationError",
]
