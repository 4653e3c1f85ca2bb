"""Shared pytest setup for jbat's tests."""


def pytest_configure(config):
  config.addinivalue_line(
      "markers", "network: needs a package registry (apt-get); skipped when unreachable"
  )
