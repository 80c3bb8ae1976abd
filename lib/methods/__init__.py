"""One package per concept method (salf, fact, cefam). A method never imports another method."""
