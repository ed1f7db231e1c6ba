"""Converters from packaged, offline datasets to the ImageFolder layout the training and probe code read."""
