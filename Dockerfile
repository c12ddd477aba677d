# The runtime image: streams only (no torch). Bundles are built outside (`make models`)
# and mounted at /models.
FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY streams ./streams
COPY model_export ./model_export
RUN pip install --no-cache-dir .
ENV BUNDLE_DIR=/models/ml-100k WEB_HOST=0.0.0.0 STATE_DIR=/tmp/state
USER nobody
ENTRYPOINT ["python", "-m", "streams"]
CMD ["worker"]
