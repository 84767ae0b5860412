"""Template builds: recipes and Dockerfiles run in a build capsule, with a step cache.

`spec` parses, `context` holds COPY's files, `executor` runs one build in a capsule, `manager`
keeps records, logs, the cache and the built-in templates made by builds (`builtin`).
"""
