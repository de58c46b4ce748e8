"""kmskeys build side: turn secrets into KMS blobs bound to their name (and user)."""
