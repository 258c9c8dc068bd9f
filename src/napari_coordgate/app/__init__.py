"""What the dock runs and remembers, without Qt: its jobs (:mod:`.jobs`) and the state that enables its buttons
(:mod:`.state`)."""
