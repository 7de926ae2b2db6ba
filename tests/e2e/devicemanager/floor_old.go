//go:build k8sold

package main

import "errors"

// The yardstick plugin is built against the grpc-go API of 1.33+ only.
func serveFloor(string) error {
	return errors.New("the grpc-go yardstick plugin is built for Kubernetes 1.33+ only")
}
