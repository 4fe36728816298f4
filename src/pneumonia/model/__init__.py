"""The networks (`zoo`) and the metrics they are compiled with (`metrics`)."""
