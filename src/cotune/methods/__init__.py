"""cotune.methods"""
