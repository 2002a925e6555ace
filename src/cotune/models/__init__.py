"""cotune.models"""
