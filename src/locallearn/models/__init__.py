"""Model builders: each returns a :class:`Backbone`, an ordered list of blocks with shapes.

Importing this package registers every builder; ``build_model(name, input_shape,
num_classes, **options)`` builds one and ``MODELS`` maps names to ``(builder, help)``.
"""

from locallearn.models import (  # noqa: F401  (importing registers them)
    mlp,
    resnet,
    text,  # noqa: F401
    vgg,
    vit,
)
from locallearn.models.blocks import MODELS, Backbone, build_model, register_model

__all__ = ["MODELS", "Backbone", "build_model", "register_model"]
