"""Device kernels shared by methods and stages: red-circle rings, text encoding, similarity, CAMs."""
