"""foldkit: fold LoRA and IA3 adapters into plain weights, verify the result, write a loadable model."""

__version__ = "0.1.0"
