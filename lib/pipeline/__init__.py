"""The shared stages' work: features, clip_images, circles, concepts, similarity. Never imports a method."""
