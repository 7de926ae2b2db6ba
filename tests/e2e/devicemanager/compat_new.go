//go:build !k8sold

// The device manager's API from 1.33 on: every call takes a klog.Logger.
package main

import (
	"context"

	v1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/util/sets"
	"k8s.io/klog/v2"
	"k8s.io/kubernetes/pkg/kubelet/cm/containermap"
	"k8s.io/kubernetes/pkg/kubelet/cm/devicemanager"
	"k8s.io/kubernetes/pkg/kubelet/cm/topologymanager"
	"k8s.io/kubernetes/pkg/kubelet/config"
	"k8s.io/kubernetes/pkg/kubelet/lifecycle"

	cadvisorapi "github.com/google/cadvisor/lib/model"
)

var logger = klog.Background()

type sourcesReady struct{}

func (sourcesReady) AddSource(string) {}
func (sourcesReady) AllReady() bool   { return true }

var _ config.SourcesReady = sourcesReady{}

func newManager() (*devicemanager.ManagerImpl, error) {
	numa := []cadvisorapi.Node{{Id: 0}, {Id: 1}}
	return devicemanager.NewManagerImpl(logger, numa, topologymanager.NewFakeManager(logger))
}

func startManager(m *devicemanager.ManagerImpl, pods func() []*v1.Pod) error {
	return m.Start(logger, pods, sourcesReady{}, containermap.NewContainerMap(), sets.New[string]())
}

func stopManager(m *devicemanager.ManagerImpl) error { return m.Stop(logger) }

func getCapacity(m *devicemanager.ManagerImpl) (v1.ResourceList, v1.ResourceList, []string) {
	return m.GetCapacity(logger)
}

func allocate(ctx context.Context, m *devicemanager.ManagerImpl, pod *v1.Pod, c *v1.Container) error {
	return m.Allocate(ctx, pod, c, lifecycle.AddOperation)
}

func runOptions(ctx context.Context, m *devicemanager.ManagerImpl, pod *v1.Pod, c *v1.Container) (*devicemanager.DeviceRunContainerOptions, error) {
	return m.GetDeviceRunContainerOptions(ctx, pod, c)
}

func allocatableDevices(m *devicemanager.ManagerImpl) devicemanager.ResourceDeviceInstances {
	return m.GetAllocatableDevices(logger)
}
