//go:build k8sold

// The device manager's API up to 1.32: no klog.Logger arguments.
package main

import (
	"context"

	cadvisorapi "github.com/google/cadvisor/info/v1"
	v1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/util/sets"
	"k8s.io/kubernetes/pkg/kubelet/cm/containermap"
	"k8s.io/kubernetes/pkg/kubelet/cm/devicemanager"
	"k8s.io/kubernetes/pkg/kubelet/cm/topologymanager"
	"k8s.io/kubernetes/pkg/kubelet/config"
)

type sourcesReady struct{}

func (sourcesReady) AddSource(string) {}
func (sourcesReady) AllReady() bool   { return true }

var _ config.SourcesReady = sourcesReady{}

func newManager() (*devicemanager.ManagerImpl, error) {
	numa := []cadvisorapi.Node{{Id: 0}, {Id: 1}}
	return devicemanager.NewManagerImpl(numa, topologymanager.NewFakeManager())
}

func startManager(m *devicemanager.ManagerImpl, pods func() []*v1.Pod) error {
	return m.Start(pods, sourcesReady{}, containermap.NewContainerMap(), sets.New[string]())
}

func stopManager(m *devicemanager.ManagerImpl) error { return m.Stop() }

func getCapacity(m *devicemanager.ManagerImpl) (v1.ResourceList, v1.ResourceList, []string) {
	return m.GetCapacity()
}

func allocate(_ context.Context, m *devicemanager.ManagerImpl, pod *v1.Pod, c *v1.Container) error {
	return m.Allocate(pod, c)
}

func runOptions(_ context.Context, m *devicemanager.ManagerImpl, pod *v1.Pod, c *v1.Container) (*devicemanager.DeviceRunContainerOptions, error) {
	return m.GetDeviceRunContainerOptions(pod, c)
}

func allocatableDevices(m *devicemanager.ManagerImpl) devicemanager.ResourceDeviceInstances {
	return m.GetAllocatableDevices()
}
