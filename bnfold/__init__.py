"""bnfold: fold inference-time BatchNormalization into neighbouring linear ops."""
