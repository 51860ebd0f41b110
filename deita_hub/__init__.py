"""deita-hub: Deita data selection, training and Hugging Face Hub releases.

The package reads as the pipeline: pool -> scoring -> embedding -> selection -> dataset (build) -> hub
(publish) -> training -> cards.
"""

__version__ = "0.1.0"
