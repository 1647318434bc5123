"""Delta compression: module roles, codecs, bit-packing and quantisation."""
