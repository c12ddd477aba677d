import pytest

from streams.config import Settings
from streams.errors import ConfigError


def test_defaults_and_env_parsing():
    s = Settings.from_env({"BATCH_SIZE": "64", "FUSION_MODE": "gate", "BATCH_WITHIN_S": "0.5",
                           "BUNDLE_DIR": "/tmp/b"})
    assert (s.batch_size, s.fusion_mode, s.batch_within_s, str(s.bundle_dir)) == (64, "gate", 0.5, "/tmp/b")
    assert s.topic_events == "events" and s.topic_dlq == "events.dlq"
    assert s.weights()["view"] == 0.5


@pytest.mark.parametrize("env", [{"FUSION_MODE": "max"}, {"BATCH_SIZE": "x"}, {"BATCH_SIZE": "0"},
                                 {"FUSION_ALPHA": "2"}, {"EVENT_WEIGHTS": "click"},
                                 {"PROCESSING_GUARANTEE": "maybe"},
                                 {"TRANSACTION_COMMIT_MS": "-1"},
                                 {"TRANSACTION_COMMIT_MS": "600000"}])
def test_bad_settings_fail_with_config_error(env):
    with pytest.raises(ConfigError):
        Settings.from_env(env)


def test_secrets_are_masked():
    s = Settings.from_env({"REDIS_URL": "redis://:hunter2@h:6379/0", "KAFKA_SASL_PASSWORD": "pw"})
    public = s.public_dict()
    assert "hunter2" not in str(public) and public["kafka_sasl_password"] == "***"
