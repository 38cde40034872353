"""MLflow 'models from code' entry: MLflow executes this file to get the pyfunc model."""
from mlflow.models import set_model

from lmpipe.serving import TextGenerator

set_model(TextGenerator())
