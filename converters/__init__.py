"""Importers of models trained in other frameworks (``converters.caffe``)."""
