"""Token streams: the relay of a job's Redis events and the SSE responses built on it."""
