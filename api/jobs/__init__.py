"""The request path of a job: submission, enqueue, admission, cancellation, deadlines, waiting, views."""
