"""Publisher readers: one module per data set that more than one task reads (ROCO: pre-training and retrieval;
MedPix 2.0: pre-training, classification and retrieval), so each is read in one place."""
