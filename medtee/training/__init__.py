"""Build the model, train it with Lightning, write the encrypted adapter."""
