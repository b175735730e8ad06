"""``star-mcore serve``: an OpenAI-compatible HTTP server over the engine. Global rank 0 runs the HTTP front end
(:mod:`.frontend`, a process of its own); every rank runs the same serving loop (:mod:`.loop`) over one
continuous batch, taking each new request in the same order from rank 0's broadcast."""
