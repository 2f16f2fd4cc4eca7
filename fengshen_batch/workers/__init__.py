"""All of the Ray wiring: `cluster` (start or join Ray, parallel file tasks), `pools` (the Ray Data pipelines of a
job and of the processors), `actors` (the model actors), `board` (in-flight progress from the actors to the
driver). Nothing outside this folder runs Ray (submission/ talks to a cluster's Jobs API through Ray's
client; processors.py names `ray.data.Dataset` in its types)."""
