"""kmskeys host root side: the request-key handler that turns blobs into kernel keys."""
