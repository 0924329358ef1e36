"""`seglab serve`: a FastAPI application around a SegModel or a detector."""
