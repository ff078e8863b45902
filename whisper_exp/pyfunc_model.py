"""MLflow models-from-code entry point: ``registry.register_run`` logs this file as the model.

Kept to one statement so logging and loading never run more than an import; the logic (request
validation, decoding, long-form generation) lives in ``whisper_exp.serving`` and
``whisper_exp.transcribe``, which travel with the model as code.
"""

import mlflow

from whisper_exp.serving import WhisperPyfunc

mlflow.models.set_model(WhisperPyfunc())
